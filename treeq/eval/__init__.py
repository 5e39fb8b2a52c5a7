"""Evaluation on the MNIST testbed: the reference classifier, the paper metrics and sample export."""
