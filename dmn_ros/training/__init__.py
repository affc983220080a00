"""Training the DMN end to end through the particle filter."""
