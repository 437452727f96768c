"""The node agent process: runtimes, batching, planning and forwarding for one node."""
