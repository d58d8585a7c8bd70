"""Worker processes and the command line composition root."""
