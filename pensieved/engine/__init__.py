"""The inference engine: everything that touches llama-cpp-python lives below this package."""
