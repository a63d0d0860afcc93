"""Generated gRPC code for the expbuild worker API, one subpackage per API version."""
