"""A hospital's local work: its data, its model copy, its privacy accountant on its own disk.

Flower builds a new ClientApp for every message, so nothing here lives in module
globals except a cache of decoded images (an optimisation: losing it costs time,
not correctness). Everything that must persist between rounds is in `state_dir`, read and
written only through `common.site_state.SiteState` (`Site.state`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch.utils.data import DataLoader, TensorDataset

from client import audit, local_state, replay
from common import drift, ledger, privacy, scores, training
from common.config import RunConfig, SiteConfig
from common.data import cache, sources, split
from common.data.decode import decode_example, is_colour
from common.errors import DataError, PrivacyBudgetExceeded, SiteStateError
from common.models import build_model, input_channels
from common.models.trainable import freeze
from common.site_policy import DEFAULT_PRIVACY_BUDGET, SitePolicy, split_node_config
from common.site_state import SiteState
from common.weights import load_record, to_record

log = logging.getLogger(__name__)
_MEMO: dict[str, tuple[TensorDataset, TensorDataset]] = {}
_MEMO_SIZE = 8
METER_LOCK = "evaluations.lock"


@dataclass(frozen=True)
class Site:
    run: RunConfig
    config: SiteConfig
    index: int | None = None  # partition id in simulation: seeds this site's randomness
    own_policy: SitePolicy | None = None  # the hospital's node config; None: its defaults (see `policy`)

    @property
    def policy(self) -> SitePolicy:
        """What this site accepts: its own; a virtual site (simulation) accepts the run's own settings."""
        if self.own_policy is not None:
            return self.own_policy
        return SitePolicy.accepting(self.run) if self.index is not None else SitePolicy()

    @property
    def state(self) -> SiteState:
        """The site's state folder: every file the site keeps is read and written through it."""
        return SiteState.of(self.config)

    @property
    def device(self) -> torch.device:
        return training.pick_device(self.config.device)

    def data(self) -> tuple[TensorDataset, TensorDataset]:
        """(train, validation) tensors, decoded once and cached on the site's disk; the split is the site's."""
        self.policy.check_resources(self.run)
        root = Path(self.config.data_path)
        examples = sources.load(root, self.run.task)
        channels = self.channels
        params = {"decoder": "v2", "task": self.run.task, "image_size": self.run.image_size,
                  **({"channels": channels} if channels != 1 else {})}  # grey: the key (and cache) as before
        fraction, split_seed = self.policy.val_fraction, self.policy.split_seed
        split_key = f"{fraction}|{split_seed}|{self.run.num_classes}"
        cache_dir = self.state.subfolder("cache")
        key = f"{root.resolve()}|{cache.cache_key(examples, root, params, cache_dir)}|{split_key}"
        if key not in _MEMO:
            decoded = cache.load_or_decode(
                examples, root, cache_dir, params,
                partial(decode_example, size=self.run.image_size, channels=channels), keep=self.policy.decode_caches,
            )
            self._check_classes(root, decoded)
            self._note_colour(examples, channels)
            val = split.held_out(decoded, fraction, split_seed)
            images = torch.from_numpy(decoded.images.astype("float32"))
            images = images.unsqueeze(1) if images.ndim == 3 else images  # (N, C, H, W)
            labels = torch.from_numpy(decoded.targets)
            if len(_MEMO) >= _MEMO_SIZE:
                _MEMO.pop(next(iter(_MEMO)))
            _MEMO[key] = (TensorDataset(images[~val], labels[~val]), TensorDataset(images[val], labels[val]))
        return _MEMO[key]

    def _note_colour(self, examples: list, channels: int) -> None:
        """A colour site whose model takes grey (channels 0 resolved to the model's 1) says so, once per
        decode: the run may have meant a colour model (`channels = 3`)."""
        if channels == 1 and not self.run.channels and examples and is_colour(examples[0]):
            log.warning("this site's images are colour but model %s takes grey: they are decoded by their luma "
                        "(set channels = 3 for a colour model, channels = 1 to silence this)", self.run.model)

    def _check_classes(self, root: Path, decoded: cache.Decoded) -> None:
        per_example = decoded.targets.reshape(len(decoded.targets), -1).max(axis=1)
        bad = [name for name, top in zip(decoded.names, per_example, strict=True) if top >= self.run.num_classes]
        if not bad:
            return
        manifest, column = sources.MANIFESTS[self.run.task]
        what = "mask values" if column == "mask" else "labels"
        raise DataError(
            f"{root / manifest}: {what} of {len(bad)} file(s) ({', '.join(bad[:3])}) reach "
            f"{int(per_example.max())}, outside num-classes = {self.run.num_classes}: "
            "fix the data or set num-classes"
        )

    @property
    def channels(self) -> int:
        """The input channels of the run's model, which this site's images are decoded to."""
        return input_channels(self.run.task, self.run.model, self.run.channels)

    def model(self, arrays: ArrayRecord, run_id: str | None = None) -> torch.nn.Module:
        """The global model, its frozen blocks (run setting `trainable`) without gradients; with
        local-norm (FedBN), this site's own normalization layers in it."""
        model = build_model(self.run.task, self.run.model, self.channels, self.run.num_classes, self.run.image_size)
        load_record(model, arrays)
        norms = local_state.load(self.state, "norms", run_id) if self.run.local_norm and run_id else None
        if norms:
            model.load_state_dict(norms, strict=False)
        freeze(model, self.run.trainable)
        return model.to(self.device)

    def _keep_norms(self, model: torch.nn.Module, run_id: str) -> None:
        if self.run.local_norm:
            state = model.state_dict()
            norms = {k: state[k] for k in local_state.norm_keys(model)}
            local_state.save(self.state, "norms", run_id, norms)

    def _optimizer(self, model: torch.nn.Module, correction: Mapping[str, torch.Tensor] | None = None,
                   proximal: bool = True) -> torch.optim.Optimizer:
        """The run's optimizer over the trainable parameters only: a frozen one is never stepped (no weight
        decay, no momentum, no drift term moves it), and Opacus noises only what the optimizer holds.
        `proximal`: FedProx's pull (training for the federation; not a site's own fine-tuning)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        mu = self.run.proximal_mu if proximal else 0.0
        return drift.make_optimizer(
            self.run.optimizer, [p for _, p in named], lr=self.run.learning_rate, momentum=self.run.momentum,
            anchor=drift.snapshot(model) if mu else None, mu=mu,
            correction=[correction[n].to(p.device) for n, p in named] if correction is not None else None,
        )

    def _generator(self, server_round: int) -> torch.Generator:
        """Seed this round's shuffling, Poisson sampling and DP noise (torch's global generator too).

        A real site draws a fresh seed for every training from the OS's CSPRNG, keyed with its secret:
        noise and batches that repeated (the same round trained again on other weights, a new run with
        the same seed) would let the server difference two releases and subtract the noise. Only a
        virtual site (simulation, `index` set) derives it from the run's seed (and, with DP, its
        derived secret), because there one researcher plays every party and wants runs to repeat.
        """
        if self.index is None:
            fresh = hmac.new(self.state.secret(), secrets.token_bytes(32), hashlib.sha256).digest()
            seed = int.from_bytes(fresh[:8], "big") % 2**63
        else:
            material = f"{self.run.seed}:{server_round}:{self.index}"
            if self.run.dp_enabled:
                material += ":" + self.state.secret().hex()
            seed = int.from_bytes(hashlib.sha256(material.encode()).digest()[:8], "big") % 2**63
        torch.manual_seed(seed)
        return torch.Generator().manual_seed(seed)

    def train(
        self, arrays: ArrayRecord, server_round: int, run_id: str,
        correction: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[ArrayRecord, dict[str, Any]]:
        """One round of local training; returns new weights and aggregate metrics only.

        `correction` (SCAFFOLD's c - c_i, by parameter name) is added to every step's gradient.
        """
        self.admit()
        self._note_new_ledger(run_id, server_round)
        self._set_threads()
        train_set, _ = self.data()
        if len(train_set) == 0:
            raise DataError("the training split is empty: add images or lower val-fraction")
        model, loader, optimizer = self._setup(arrays, server_round, run_id, correction, train_set)
        if self.run.dp_enabled:
            result = self._train_dp(arrays, server_round, run_id, correction is None, model, loader, optimizer)
        else:
            result = self._train_plain(run_id, model, loader, optimizer)
        self._count_trained(run_id, server_round)
        return result

    def admit(self) -> None:
        """Refuse, before any data is read or memory taken, a run the site does not accept: at a site whose
        ledger fails verification, an error; then whatever the site's policy refuses (a real site trains
        without DP only if its hospital set allow-no-dp: such rounds carry no ε and are outside its budget);
        a virtual site with a budget refuses training without DP (ε would be inf)."""
        book = self._ledger()
        book.entries()  # a ledger edited, truncated or deleted stops the site here (PrivacyLedgerError)
        self.policy.check_training(self.run)
        if not self.run.dp_enabled and self.budget and self.index is not None:
            self._check_budget(book, None)

    def _note_new_ledger(self, run_id: str, server_round: int) -> None:
        """The hospital chose `new-ledger` where its key shows a ledger was deleted: say so in its audit log."""
        if self.policy.new_ledger and self._ledger().deleted():
            log.warning("starting a new privacy ledger in %s (node config new-ledger = true): the site's "
                        "earlier ε is no longer counted", self.state.path)
            audit.record(self.state, run_id, 0, "new-ledger", server_round,
                         {"ledger-key": str(self.ledger_key.path)})

    def _setup(self, arrays: ArrayRecord, server_round: int, run_id: str,
               correction: Mapping[str, torch.Tensor] | None,
               train_set: TensorDataset) -> tuple[torch.nn.Module, DataLoader, torch.optim.Optimizer]:
        generator = self._generator(server_round)
        model = self.model(arrays, run_id)
        loader = DataLoader(train_set, batch_size=self.run.batch_size, shuffle=True, generator=generator)
        return model, loader, self._optimizer(model, correction)

    def _train_plain(self, run_id: str, model: torch.nn.Module, loader: DataLoader,
                     optimizer: torch.optim.Optimizer) -> tuple[ArrayRecord, dict[str, Any]]:
        metrics = {**self._counts(loader), "train-loss": self._fit(model, loader, optimizer),
                   "local-steps": optimizer.steps}
        return self._finish(model, run_id), metrics

    def _train_dp(self, arrays: ArrayRecord, server_round: int, run_id: str, replayable: bool, model: torch.nn.Module,
                  loader: DataLoader, optimizer: torch.optim.Optimizer) -> tuple[ArrayRecord, dict[str, Any]]:
        """DP-SGD within the run's target and the site's budget; a round asked again gets the same reply
        (`replayable`: no SCAFFOLD correction, whose state the stored reply would not match)."""
        request = replay.key(run_id, server_round, arrays, self.run) if replayable else None
        sent = replay.load(self.state, run_id, request) if request else None
        if sent is not None:  # this round again, as after a coordinator's resume: the same reply, no new ε
            log.info("round %d of run %s: trained already; sending the same reply again", server_round, run_id)
            spent = self._spent(self._ledger(), run_id, self.run.dp_target_delta, sent[1]["num-examples"])
            return sent[0], {**_without_loss(sent[1]), **spent}
        counts = self._counts(loader)
        self.policy.check_delta(self.run.dp_target_delta, counts["num-examples"])
        dp = privacy.plan(
            self.run.dp_target_epsilon, self.run.dp_target_delta, counts["num-examples"], self.run.batch_size,
            self.run.local_epochs, self.run.num_server_rounds, self.run.dp_max_grad_norm, state=self.state,
            accountant=self.policy.accountant,  # the noise for the target by the ledger's own accountant
        )
        self.policy.check_noise(dp.noise_multiplier)
        with self._ledger(self._data_identity()).locked() as book:
            self._check_run_target(book, dp, run_id)
            self._check_budget(book, dp, counts["num-examples"])
            engine, module, optimizer, loader = privacy.make_private(model, optimizer, loader, dp)
            self._fit(module, loader, optimizer)  # its loss is not sent: see `_without_loss`
            spent = [tuple(h) for h in engine.accountant.history]
            book.append(ledger.Entry(run_id, server_round, dp.noise_multiplier, dp.sample_rate,
                                     sum(n for _, _, n in spent), dp.delta, spent))
        metrics = {**counts, **self._spent(book, run_id, dp.delta, counts["num-examples"]),
                   "noise-multiplier": dp.noise_multiplier, "local-steps": optimizer.original_optimizer.steps}
        reply = self._finish(model, run_id)
        if request:
            replay.save(self.state, run_id, request, reply, metrics)
        return reply, metrics

    def train_distributed(self, arrays: ArrayRecord, server_round: int, run_id: str,
                          threshold: int) -> tuple[ArrayRecord, dict[str, Any], int]:
        """Distributed DP (dp-mode = distributed): this round is exactly one DP-SGD step (Opacus: Poisson rate
        q = 1/ceil(n / batch-size), per-sample clip to dp-max-grad-norm), adding 1/sqrt(threshold) of the noise
        dp-noise-multiplier x dp-max-grad-norm that the SecAgg+ sum of >= `threshold` sites then carries whole.
        Returns (new weights, metrics, SecAgg+ weight): the weight is Opacus's expected batch q·n, the
        divisor of this step, so the server's weighted mean is the pooled batch's step (privacy.distributed_plan).

        The round is this site's own DP release of (sigma, q, 1 step), checked against the run's target and the
        site's budget and written to its ledger as distributed. Fresh noise every time, never a replay: the
        same update sent again under new masks into a sum over other sites would let the server difference
        it out with less noise than planned; a round trained again is a new release, and counted."""
        self.admit()
        self._note_new_ledger(run_id, server_round)
        self._set_threads()
        self.policy.check_noise(self.run.dp_noise_multiplier)  # the sum's: the noise this round is accounted with
        train_set, _ = self.data()
        if len(train_set) == 0:
            raise DataError("the training split is empty: add images or lower val-fraction")
        n = len(train_set)
        self.policy.check_delta(self.run.dp_target_delta, n)
        dp = privacy.distributed_plan(self.run.dp_noise_multiplier, threshold, self.run.dp_target_delta, n,
                                      self.run.batch_size, self.run.num_server_rounds, self.run.dp_max_grad_norm)
        with self._ledger(self._data_identity()).locked() as book:
            self._check_run_target(book, dp, run_id)
            self._check_budget(book, dp, n)
            model, loader, optimizer = self._setup(arrays, server_round, run_id, None, train_set)
            _, module, optimizer, loader = privacy.make_private(model, optimizer, loader, dp)
            training.one_step(module, loader, optimizer, self.device,
                              training.loss_for(self.run.task, self.run.loss_weights))
            book.append(ledger.Entry(run_id, server_round, dp.noise_multiplier, dp.sample_rate, 1, dp.delta,
                                     dp.round_history(), mode=ledger.DISTRIBUTED))
        self._count_trained(run_id, server_round)
        weight = max(1, min(int(optimizer.expected_batch_size), self.run.max_site_weight))
        metrics = {**self._counts(loader), **self._spent(book, run_id, dp.delta, n),
                   "noise-multiplier": dp.noise_multiplier, "local-steps": 1}
        return self._finish(model, run_id), metrics, weight

    def _ledger(self, data: str = "") -> ledger.PrivacyLedger:
        """The site's ledger, signed with its key; `data`: the identity new entries record."""
        return ledger.PrivacyLedger(self.state, self.ledger_key, data, new=self.policy.new_ledger,
                                    accountant=self.policy.accountant)

    @property
    def ledger_key(self) -> ledger.LedgerKey:
        """The ledger's HMAC key: the site's `ledger-key`, else `<state-dir>.ledger-key` beside the folder."""
        state = Path(self.config.state_dir)
        return ledger.LedgerKey(Path(self.policy.ledger_key) if self.policy.ledger_key
                                else state.parent / f"{state.name}.ledger-key")

    def _data_identity(self) -> str:
        """What a ledger entry was trained on: a digest of the site's files and manifest rows, whatever the
        run's decoding settings (the cache's digests: nothing hashed twice)."""
        root = Path(self.config.data_path)
        return cache.cache_key(sources.load(root, self.run.task), root, {"identity": self.run.task},
                               self.state.subfolder("cache"))

    @staticmethod
    def _counts(loader: DataLoader) -> dict[str, Any]:
        return {"num-examples": len(loader.dataset), "site-weight": 1}

    def _spent(self, book: ledger.PrivacyLedger, run_id: str, delta: float, n: int) -> dict[str, float]:
        """The run's ε at its δ; the site's total at the site's δ (`SitePolicy.total_delta`)."""
        return {"epsilon": book.epsilon(book.history(run_id), delta),
                "epsilon-total": book.total_epsilon(self.policy.total_delta(n, book.delta()))}

    def _fit(self, model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer) -> float:
        return training.train(model, loader, optimizer, self.run.local_epochs, self.device,
                              training.loss_for(self.run.task, self.run.loss_weights))

    def _finish(self, model: torch.nn.Module, run_id: str) -> ArrayRecord:
        """What both paths end with: FedBN's layers kept on the site, the rest sent."""
        self._keep_norms(model, run_id)
        return to_record(model)

    @property
    def budget(self) -> float:
        """The site's own budget; none named: a virtual site (simulation) takes the run's
        `site-privacy-budget`, a real one the conservative default (a hand-written node config too)."""
        if self.config.privacy_budget:
            return self.config.privacy_budget
        return self.run.site_privacy_budget if self.index is not None else DEFAULT_PRIVACY_BUDGET

    def _check_run_target(self, book: ledger.PrivacyLedger, dp: privacy.DPPlan, run_id: str) -> None:
        """Refuse a round that would take this run past its target ε at this site.

        A plan calibrated to the target (local DP) spends it if the site trains each round once: a
        round trained twice that the replay cannot answer (SCAFFOLD, or settings changed on a resume)
        would overshoot, and within the plan (the usual case) this is arithmetic, with no ε evaluation.
        A distributed plan's sigma is the coordinator's, not derived from the target: every round is
        evaluated, at this site's own rate q, with no search tolerance.
        """
        spent = book.history(run_id)
        steps = sum(n for _, _, n in spent) + dp.steps_per_round
        if (dp.calibrated and steps <= dp.planned_steps
                and all((s, q) == (dp.noise_multiplier, dp.sample_rate) for s, q, _ in spent)):
            return
        would_be = book.epsilon(spent + dp.round_history(), dp.delta)
        target = self.run.dp_target_epsilon
        if would_be > target + (privacy.SEARCH_TOLERANCE if dp.calibrated else 0.0):
            raise PrivacyBudgetExceeded(
                f"run {run_id}: this round would spend ε={would_be:.3f} at this site (sigma = "
                f"{dp.noise_multiplier:g}, q = {dp.sample_rate:.3g}), over the run's target {target:g}"
                + ("" if not dp.calibrated else " (a round trained again after a resume?)"),
                spent=book.epsilon(spent, dp.delta), budget=target, would_be=would_be,
            )

    def _check_budget(self, book: ledger.PrivacyLedger, dp: privacy.DPPlan | None, n: int = 0) -> None:
        """Refuse, before any step, a round that would take the site past its budget (at the site's δ)."""
        if not self.budget:
            return
        if dp is None:
            raise PrivacyBudgetExceeded(
                "site has a privacy budget and the run asks for training without DP", spent=book.total_epsilon(),
                budget=self.budget, would_be=float("inf"),
            )
        delta = self.policy.total_delta(n, book.delta(dp.delta))
        would_be = book.epsilon(book.history() + dp.round_history(), delta)
        if would_be > self.budget:
            raise PrivacyBudgetExceeded(
                f"next round would spend ε={would_be:.3f} in total, over the site's budget {self.budget:g}",
                spent=book.total_epsilon(), budget=self.budget, would_be=would_be,
            )

    def evaluate(self, arrays: ArrayRecord, run_id: str | None = None) -> dict[str, Any]:
        """The global model on this site's held-out split: aggregate metrics only.

        With local-norm or fine-tune-epochs, also the personalized model's (`personal-*`): this
        site's normalization layers in it, then fine-tuned on the site's training split. The
        personalized model never leaves the site; only its metrics do.
        """
        self.policy.check_evaluation_settings(self.run)
        self._count_evaluation(run_id)
        self._set_threads()
        _, val_set = self.data()
        self.policy.check_validation(len(val_set))
        loader = DataLoader(val_set, batch_size=256)
        result = training.evaluate(self.model(arrays), loader, self.device, self.run.task)
        reply: dict[str, Any] = {"num-examples": result.num_examples, "site-weight": 1, **self._scores(result)}
        if self.run.local_norm or self.run.fine_tune_epochs:
            personal = training.evaluate(self._personalized(arrays, run_id), loader, self.device, self.run.task)
            reply.update({f"personal-{k}": v for k, v in self._scores(personal, grid=False).items()
                          if k != "auc-weight"})
        return self.policy.rounded(reply)

    def _count_evaluation(self, run_id: str | None) -> None:
        """Spend one of the run's evaluations (SitePolicy.evaluation_allowance) before anything is read;
        an evaluation that then fails still counts: the allowance bounds what was asked."""
        name = _meter_name(run_id)
        with self.state.lock(METER_LOCK):
            meter = self._meter(name)
            trained = min(len(meter["trained"]), self.run.num_server_rounds)  # round numbers are the server's
            self.policy.check_evaluation(meter["answered"], trained)
            self.state.write_json(name, {**meter, "answered": meter["answered"] + 1})

    def _count_trained(self, run_id: str, server_round: int) -> None:
        """Note a round trained in this run: what earns it more evaluations (once per round number)."""
        name = _meter_name(run_id)
        with self.state.lock(METER_LOCK):
            meter = self._meter(name)
            if server_round not in meter["trained"]:
                self.state.write_json(name, {**meter, "trained": [*meter["trained"], server_round]})

    def _meter(self, name: str) -> dict[str, Any]:
        """A run's evaluation meter; a damaged one is an error, never a fresh allowance."""
        try:
            data = self.state.read_json(name) or {"trained": [], "answered": 0}
            return {"trained": [int(r) for r in data["trained"]], "answered": int(data["answered"])}
        except (ValueError, KeyError, TypeError) as exc:
            raise SiteStateError(f"{self.state.path_for(name)} cannot be read ({exc}): this run's evaluations "
                                 "cannot be counted; delete the file to restart its count") from None

    def _scores(self, result: training.Evaluation, grid: bool = True) -> dict[str, Any]:
        return scores.reply(result, self.run.task, self.run.num_classes, grid)  # the same keys from every site

    def _personalized(self, arrays: ArrayRecord, run_id: str | None) -> torch.nn.Module:
        model = self.model(arrays, run_id)
        if self.run.fine_tune_epochs:
            train_set, _ = self.data()
            loader = DataLoader(train_set, batch_size=self.run.batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed(self.run.seed))
            training.train(model, loader, self._optimizer(model, proximal=False), self.run.fine_tune_epochs,
                           self.device, training.loss_for(self.run.task, self.run.loss_weights))
        return model

    def _set_threads(self) -> None:
        if self.run.client_threads > 0:
            torch.set_num_threads(self.run.client_threads)


def _meter_name(run_id: str | None) -> str:
    return SiteState.run_name("evaluations", run_id or "no-run", ".json")


def _without_loss(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A DP reply without `train-loss`: the loss over the private batches is an exact function of the
    patients' images that DP-SGD's noise does not cover, and neither would the noised model's loss on
    the same images; no ε is accounted for it, so it does not leave the site (older stored replies)."""
    return {k: v for k, v in metrics.items() if k != "train-loss"}


def site_from_context(run: RunConfig, node_config: Mapping[str, Any]) -> Site:
    """Simulation gives only a partition id: derive the paths, accept the run's settings; deployment
    names its paths and its policy (common/site_policy.py) in its node config."""
    if "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        config = SiteConfig(str(run.site_data_path(pid)), str(run.site_state_dir(pid)), "auto")
        return Site(run, config, pid)
    policy, rest = split_node_config(node_config)
    return Site(run, SiteConfig.from_mapping(rest), own_policy=policy)
