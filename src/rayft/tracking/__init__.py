"""MLflow helpers: the driver opens and closes the run; rank 0 logs step metrics into it."""
