"""Usage metering: the handler (write side) and the usage read side."""
