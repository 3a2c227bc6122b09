"""One module per op: public API, argument checks, registration (fakes, autograd)."""
