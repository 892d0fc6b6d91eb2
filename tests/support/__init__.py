"""What tests (and benchmarks) share: tiny models, scan inputs, recipes, the official oracles.

Test modules import helpers from here, never from one another."""
