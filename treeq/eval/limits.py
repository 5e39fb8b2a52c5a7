"""What measuring samples needs, importable without torch (the command line checks it before loading)."""
MIN_MEASURED = 10  # the Inception Score's splits (metrics.inception_score): fewer samples leave a split empty
