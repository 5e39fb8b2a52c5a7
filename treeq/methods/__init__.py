"""PTQ methods: input transforms (Hadamard rotation, smoothing), calibrated rounding (GPTQ) and their
registry, which the recipe, the CLI and the benchmarks read."""
