"""The pretraining objectives, chosen by `objective.kind` (one ObjectiveConfig holds every kind's settings):

    mert      mert.py      masked prediction of offline teachers' codes (k-means, EnCodec; data.labels) + CQT
    bestrq    bestrq.py    masked prediction of a frozen random-projection quantizer's codes, made in the step
    data2vec  data2vec.py  masked regression of an EMA teacher's averaged layers (Music2Vec)

Each is an nn.Module around the encoder: `(cfg, encoder, codebook_sizes)` -> forward(audio, lengths, labels,
generator, skip) -> (loss, logs); data2vec also has `after_update(step, total_steps)`.
"""
from pretrain.objectives.bestrq import BestRQObjective
from pretrain.objectives.data2vec import Data2VecObjective
from pretrain.objectives.mert import Objective

OBJECTIVES = {"mert": Objective, "bestrq": BestRQObjective, "data2vec": Data2VecObjective}  # objective.kind -> class
