"""Post-training quantization of a whole model: the recipe, applying it, calibration sets and run folders."""
