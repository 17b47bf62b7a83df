"""Developer tools for demos, tests and benchmarks; the runtime never imports them."""
