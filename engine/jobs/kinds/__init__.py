"""The kinds of job a worker can run: a name, a params class, and a function.

A kind's function takes its validated params and a ``progress(fraction, message)`` callback
and returns a JSON-serialisable result. Functions import the engine lazily, so the manager
(which only validates specs) stays light. One module per kind (``engine.jobs.kinds.<kind>``)
registers itself on import; the registry is ``engine.jobs.kinds.base``. Importing this package
registers every kind, in the order below (the order ``JOB_KINDS`` lists them).
"""

from engine.jobs.kinds.base import JOB_KINDS, JobKind, Progress, get_kind, register_kind
from engine.jobs.kinds.merge import MergeJobParams
from engine.jobs.kinds.evaluate import EvalJobParams
from engine.jobs.kinds.zoo_build import ZooBuildJobParams
from engine.jobs.kinds.analyze import AnalyzeJobParams
from engine.jobs.kinds.compress import CompressJobParams, DecompressJobParams
from engine.jobs.kinds.extract_lora import ExtractLoraJobParams
from engine.jobs.kinds.repair import RepairJobParams
from engine.jobs.kinds.moe import MoEJobParams
from engine.jobs.kinds.transfer import TransferJobParams
from engine.jobs.kinds.tune import TuneJobParams
from engine.jobs.kinds.visionfuse import VisionFuseJobParams

__all__ = ["AnalyzeJobParams", "CompressJobParams", "DecompressJobParams", "EvalJobParams",
           "ExtractLoraJobParams", "JOB_KINDS", "JobKind", "MergeJobParams", "MoEJobParams",
           "Progress", "RepairJobParams", "TransferJobParams", "TuneJobParams",
           "VisionFuseJobParams", "ZooBuildJobParams", "get_kind", "register_kind"]
