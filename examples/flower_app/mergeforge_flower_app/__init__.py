"""A minimal Flower app with mergeforge's MergeStrategy as the server's aggregation."""
