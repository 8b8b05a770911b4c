"""rayft sweep: Ray Tune over the training of rayft train."""
