"""Sinks render a Frame; they never read a source or change the model."""
