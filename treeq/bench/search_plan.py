"""`treeq bench search-plan`: what the default tree search costs on each family's published transformer, by
search.estimate.plan_tree_search on the model built on the meta device: the cost `treeq search` prints
before it scores, in block-row runs and image equivalents (an image: blocks x steps, x 2 where guidance
doubles the batch, at the family's published settings).

The default search: W4A4 target and its 8 candidates, queue 16, 16 calibration rows, readout one block past
the segment. The levers that would cut it (issue 31) are measured by changing these settings.
"""
from ..bits import uniform_config
from ..models.families import family_names
from ..models.shapes import meta_transformer
from ..search.estimate import plan_tree_search
from ..search.space import DEFAULT_CANDIDATES, SearchSpace

DEV_STEPS = {"flux": (28,)}  # FLUX.1-dev samples in 28 steps (guidance distilled: one row a step, as schnell)


def bench_search_plan(settings=None, queue_size=16, rows=16, readout_blocks=1):
    """Rows {family, steps, layers, evaluations, block_runs, block_row_runs, image_block_rows,
    image_equivalents}. FLUX twice: the folder's FLUX.1-schnell (4 steps) and FLUX.1-dev's 28 steps."""
    out = []
    for name in settings or family_names():
        model = meta_transformer(name)
        space = SearchSpace.build(list(uniform_config(model, 8, 8)), DEFAULT_CANDIDATES[4.0])
        for steps in (model.sampling["steps"], *DEV_STEPS.get(name, ())):
            plan = plan_tree_search(model, space, queue_size, rows, readout_blocks=readout_blocks,
                                    sampling={"steps": steps})
            out.append({"family": name, "steps": steps, "layers": len(space.layers), **{key: plan[key] for key in (
                "evaluations", "block_runs", "block_row_runs", "image_block_rows", "image_equivalents")}})
    return out
