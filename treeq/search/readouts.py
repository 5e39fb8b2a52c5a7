"""What a tree node reads `readout_blocks` past its segment (search/objective.py), importable without torch.

hidden: the tokens leaving that block, MSE to full precision. lens: the model's head run on those tokens and
read as the output is (the sampler's step on trajectory states), so a node weighs errors as the sampler does.
"""
READOUTS = ("hidden", "lens")
DEFAULT_READOUT = "hidden"
