"""Development tools, never imported at run time: local servers, the simulator."""
