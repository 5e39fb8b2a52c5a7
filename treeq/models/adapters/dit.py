"""Our DiT (facebookresearch/DiT's layout; the testbed, official checkpoints, converted diffusers DiTs).

Its calibration inputs are the tuple (x_t, t, y) and its chain is the model's own embed / run_blocks /
head, so the engine computes exactly what it computed before adapters existed.
"""
import torch

from .base import register, top_linears


@register("DiT")
class DiTAdapter:
    family = "dit"
    pipeline = ""

    def block_names(self, model):
        return [f"blocks.{index}" for index in range(len(model.blocks))]

    def layers(self, model):
        """adaLN modulation is registered last but runs first: it computes the block's shifts, scales and gates."""
        names = []
        for block in self.block_names(model):
            linears = sorted(top_linears(model.get_submodule(block)), key=lambda n: not n.startswith("adaLN_modulation"))
            names += [f"{block}.{name}" for name in linears]
        return names

    def block_of(self, model):
        return {name: int(name.split(".")[1]) for name in self.layers(model)}

    def layer_rows(self, model):
        """Token-wise linears run once per token; adaLN modulation once per image, on the conditioning."""
        tokens = (model.config.input_size // model.config.patch_size) ** 2
        return {name: 1 if "adaLN_modulation" in name else tokens for name in self.layers(model)}

    def describe(self, model):
        return model.config.to_dict()

    def num_rows(self, calibration):
        return len(calibration[0])

    def select_rows(self, calibration, index):
        return tuple(part[index] for part in calibration)

    def batches(self, calibration, batch_size, device=None):
        for start in range(0, len(calibration[0]), batch_size):
            yield tuple(part[start:start + batch_size].to(device) for part in calibration)

    def forward(self, model, inputs):
        return model(*inputs)

    def embed(self, model, inputs):
        return model.embed(*inputs)

    def run_blocks(self, model, state, start, end):
        tokens, c = state
        return model.run_blocks(tokens, c, start, end), c

    def head(self, model, inputs, state):
        return model.head(*state)

    def readout(self, state):
        return state[0]


def check_dit_calibration(calibration):
    """Raise ValueError unless `calibration` is (x_t, t, y): three tensors of one non-zero batch size."""
    if not (isinstance(calibration, (tuple, list)) and len(calibration) == 3
            and all(torch.is_tensor(part) for part in calibration)):
        raise ValueError("calibration must be a tuple of three tensors (x_t, t, y)")
    if len({len(part) for part in calibration}) != 1 or len(calibration[0]) == 0:
        raise ValueError(f"calibration tensors need one equal, non-zero batch size, got "
                         f"{[len(part) for part in calibration]}")
    return calibration
