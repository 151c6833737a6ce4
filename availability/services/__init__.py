"""gRPC servicers: thin layers that validate, call the domain and build responses."""
