"""Benchmarks behind `treeq bench`: each returns a list of flat dict rows; printing is the CLI's job."""
