"""Images in: decoding, listing of input archives, the MVTec AD layout, scoring plans, synthetic data."""
