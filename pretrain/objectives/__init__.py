"""The pretraining objectives, chosen by `objective.kind`; each is one module (masked.py says what it provides):

    mert      mert.py      masked prediction of offline teachers' codes (k-means, EnCodec; data.labels) + CQT
    bestrq    bestrq.py    masked prediction of a frozen random-projection quantizer's codes, made in the step
    data2vec  data2vec.py  masked regression of an EMA teacher's averaged layers (Music2Vec)

The run config's `objective` section (`ObjectiveConfig`) is made from this dict: the shared settings of the
masked step (`MaskedConfig`: objective.kind, objective.mask_prob, ...) and one section per kind, each that kind's
`Settings` (objective.mert.proj_dim, objective.bestrq.seed, objective.data2vec.top_k, ...). The trainer, the
config checks and the benchmarks know of objectives only through OBJECTIVES: a new objective is a new module and
a line here.
"""
from dataclasses import field, make_dataclass

from pretrain.objectives.bestrq import BestRQObjective
from pretrain.objectives.data2vec import Data2VecObjective
from pretrain.objectives.masked import MaskedConfig, MaskedObjective
from pretrain.objectives.mert import MertObjective

OBJECTIVES: dict[str, type[MaskedObjective]] = {  # objective.kind -> its module's objective
    "mert": MertObjective,
    "bestrq": BestRQObjective,
    "data2vec": Data2VecObjective,
}

ObjectiveConfig = make_dataclass(  # MaskedConfig's fields, then objective.<kind>: <kind>'s Settings, for each kind
    "ObjectiveConfig", [(kind, cls.Settings, field(default_factory=cls.Settings)) for kind, cls in OBJECTIVES.items()],
    bases=(MaskedConfig,), frozen=True)
ObjectiveConfig.__module__ = __name__
