"""What an ML user would run instead of the grid, for `nightshift bench search`: random
search and Optuna's TPE and CMA-ES samplers (default settings), over the same knobs.

The search box is what a user would write around the seed's values: x1/4 to x4 in log
space for sizes and rates (a power of two by its exponent), 1 - beta likewise, ratios over
[0, 1]. A sampled batch that breaks the trainer's rule (TOTAL_BATCH_SIZE a whole number of
forward passes) is raised to the next valid one, as a user would write the search space.
Optuna is a dev dependency: the bench says so when it is missing.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from typing import Any

from services.contracts.knobs import SEQ_LEN_BY_PROFILE, Domain, batch_pairs
from services.launcher import landscape as ls
from services.proposer.constants import find_constants, format_value, rewrite
from services.proposer.strategy import Proposal, ProposalRequest

BOX = 4.0  # the box spans reference / BOX .. reference x BOX in log space


@dataclass(frozen=True)
class Dimension:
    """One knob's range: low..high in its sampling coordinate."""

    domain: Domain
    reference: float
    low: float
    high: float
    log: bool
    integer: bool  # an integer (pow2: the exponent)

    def value(self, x: float) -> int | float:
        """The knob's value at coordinate x."""
        match self.domain.kind:
            case "pow2":
                return 1 << max(0, round(x))
            case "int":
                return max(1, round(x))
            case "beta":
                return self.domain.nearest(1 - x)
            case _:
                return self.domain.nearest(x)

    def coordinate(self, value: float) -> float:
        match self.domain.kind:
            case "pow2":
                return round(math.log2(value))
            case "beta":
                return 1 - value
            case _:
                return value


def dimension(domain: Domain, reference: float) -> Dimension:
    match domain.kind:
        case "pow2":
            e = math.log2(reference)
            step = math.log2(BOX)
            return Dimension(domain, reference, e - step, e + step, False, True)
        case "int":
            return Dimension(
                domain,
                reference,
                max(1, round(reference / BOX)),
                round(reference * BOX),
                True,
                True,
            )
        case "beta":
            gap = 1 - reference
            return Dimension(domain, reference, gap / BOX, min(gap * BOX, 0.99), True, False)
        case "ratio":
            return Dimension(domain, reference, 0.0, 1.0, False, False)
        case "positive":
            return Dimension(domain, reference, reference / BOX, reference * BOX, True, False)
        case _:
            spread = max(abs(reference), 0.1) * 2
            low = 0.0 if domain.nonnegative else reference - spread
            return Dimension(domain, reference, low, reference + spread, False, False)


class BoxSearcher:
    """Samples knob values in the box; subclasses decide how. Proposals rewrite the seed."""

    name = "random"

    def __init__(self, scape: ls.Landscape, seed_source: str, sim_seed: int) -> None:
        self.seed_source = seed_source
        self.found = find_constants(seed_source)
        consts = {c.name: c for c in self.found}
        self.dims = {
            name: dimension(scape.domains[name], consts[name].value)
            for name in scape.reference
            if name in consts
        }
        self.seq_len = SEQ_LEN_BY_PROFILE.get(scape.profile, 1)
        self.rng = random.Random(f"random:{sim_seed}")
        self.count = 0

    def sample(self) -> dict[str, float]:
        """Coordinates of one new point."""
        return {
            name: (
                math.exp(self.rng.uniform(math.log(d.low), math.log(d.high)))
                if d.log
                else self.rng.uniform(d.low, d.high)
            )
            for name, d in self.dims.items()
        }

    def values(self, coords: dict[str, float]) -> dict[str, int | float]:
        values = {name: self.dims[name].value(x) for name, x in coords.items()}
        for total, device in batch_pairs(values):  # the user's repair: a whole number of rows
            rows = int(values[device]) * self.seq_len
            values[total] = max(rows, -(-int(values[total]) // rows) * rows)
        return values

    def source(self, values: dict[str, int | float]) -> str:
        consts = {c.name: c for c in self.found}
        changes = {name: format_value(consts[name], v) for name, v in values.items()}
        return rewrite(self.seed_source, changes, self.found)

    def plan(self, request: ProposalRequest) -> list[Proposal]:
        out = []
        for _ in range(request.k):
            self.count += 1
            source = self.source(self.values(self.sample()))
            out.append(Proposal(f"{self.name} trial {self.count}", source, request.parent_id))
        return out

    def tell(self, variant_id: str, source: str, value: float | None) -> None:
        pass


def random_searcher(scape: ls.Landscape, seed_source: str, sim_seed: int) -> BoxSearcher:
    return BoxSearcher(scape, seed_source, sim_seed)


class OptunaSearcher(BoxSearcher):
    """Optuna's ask/tell over the box; the baseline's result is told as a first trial."""

    def __init__(self, scape: ls.Landscape, seed_source: str, sim_seed: int, sampler: str) -> None:
        super().__init__(scape, seed_source, sim_seed)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self.optuna = optuna
        self.name = sampler
        chosen: Any = (
            optuna.samplers.TPESampler(seed=sim_seed)
            if sampler == "tpe"
            else optuna.samplers.CmaEsSampler(seed=sim_seed)
        )
        self.study = optuna.create_study(sampler=chosen)
        self.distributions: dict[str, Any] = {
            name: (
                optuna.distributions.IntDistribution(int(d.low), int(d.high), log=d.log)
                if d.integer
                else optuna.distributions.FloatDistribution(d.low, d.high, log=d.log)
            )
            for name, d in self.dims.items()
        }
        self.trials: dict[str, Any] = {}
        self.seed_id = ""

    def plan(self, request: ProposalRequest) -> list[Proposal]:
        out = []
        if not self.seed_id:
            self.seed_id = request.parent_id  # the baseline runs first: its result seeds Optuna
        for _ in range(request.k):
            trial = self.study.ask(self.distributions)
            self.count += 1
            source = self.source(self.values(dict(trial.params)))
            out.append(Proposal(f"{self.name} trial {self.count}", source, request.parent_id))
            self.trials[source] = trial
        return out

    def tell(self, variant_id: str, source: str, value: float | None) -> None:
        trial = self.trials.pop(source, None)
        if trial is None:
            if variant_id == self.seed_id and value is not None:
                params = {n: d.coordinate(d.reference) for n, d in self.dims.items()}
                self.study.add_trial(
                    self.optuna.trial.create_trial(
                        params=params, distributions=self.distributions, value=value
                    )
                )
            return
        if value is None:
            self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(trial, value)


def optuna_searcher(
    scape: ls.Landscape, seed_source: str, sim_seed: int, sampler: str
) -> OptunaSearcher:
    try:
        return OptunaSearcher(scape, seed_source, sim_seed, sampler)
    except ImportError as exc:
        raise LookupError(
            f"the {sampler} baseline needs Optuna ({exc}): install the dev extra "
            "(pip install -e '.[dev]') or leave it out with --strategies grid,random"
        ) from exc
