"""`treeq bench search-plan`: what the tree search costs on each family's published transformer, by
search.estimate.plan_tree_search on the model built on the meta device: the cost `treeq search` prints
before it scores, in block-row runs and image equivalents (an image: blocks x steps, x 2 where guidance
doubles the batch, at the family's published settings).

The default search: W4A4 target and its 8 candidates, queue 16, 16 trajectory states (32 model rows where
guidance doubles the batch), readout one block past the segment. Each lever of bench search's LEVERS (issue 31)
is planned beside it, with the same settings.
"""
from ..bits import uniform_config
from ..models.families import family_names
from ..models.shapes import meta_transformer
from ..search.estimate import plan_tree_search, state_rows
from ..search.schedule import model_schedule
from ..search.space import DEFAULT_CANDIDATES, SearchSpace
from .search import LEVERS

DEV_STEPS = {"flux": (28,)}  # FLUX.1-dev samples in 28 steps (guidance distilled: one row a step, as schnell)
DEFAULT = {"method": "tss"}


# Early exit's cost depends on the metrics it meets: its plan is the default's bound, so it is measured, not planned.
PLANNED = tuple(name for name, options in LEVERS.items() if not options.get("early_exit"))


def bench_search_plan(settings=None, states=16, levers=("tss", *PLANNED)):
    """Rows {family, steps, search, layers, rows, evaluations, block_runs, block_row_runs, image_block_rows,
    image_equivalents, cut}: the default search (`tss`) and each lever on `states` trajectory states (`rows`
    model rows), `cut` the default's cost over the lever's. FLUX twice: the folder's FLUX.1-schnell (4 steps)
    and FLUX.1-dev's 28 steps."""
    unknown = [name for name in levers if name != "tss" and name not in PLANNED]
    if unknown:
        raise ValueError(f"unknown lever {unknown[0]!r}; planned: tss, {', '.join(PLANNED)}")
    out = []
    for name in settings or family_names():
        model = meta_transformer(name)
        space = SearchSpace.build(list(uniform_config(model, 8, 8)), DEFAULT_CANDIDATES[4.0])
        per_state = state_rows(model)
        for steps in (model.sampling["steps"], *DEV_STEPS.get(name, ())):
            default = None
            for lever in levers:
                plan = _plan(model, space, states, per_state, {"steps": steps}, LEVERS.get(lever, DEFAULT))
                default = default or plan["image_equivalents"]
                out.append({"family": name, "steps": steps, "search": lever, "layers": len(space.layers),
                            "rows": plan["rows"],
                            **{key: plan[key] for key in ("evaluations", "block_runs", "block_row_runs",
                                                          "image_block_rows", "image_equivalents")},
                            "cut": default / plan["image_equivalents"]})
    return out


def _plan(model, space, states, per_state, sampling, options):
    """plan_tree_search with a bench lever's run_search options (queue, low levels and their states, readout)."""
    schedule = model_schedule(model, space.layers, options.get("queue_size", 16), options.get("low_levels"),
                              options.get("low_queue"), options.get("low_rows"))
    low_rows = min(states, schedule.low_rows) * per_state if schedule.low_rows else None
    return plan_tree_search(model, space, schedule, states * per_state, readout_blocks=options.get("readout_blocks", 1),
                            sampling=sampling, low_rows=low_rows)
