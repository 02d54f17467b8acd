"""The ``aggregation`` section: how a peer combines its neighbours' models (a plain or a
robust rule), secure aggregation's fixed point and sharing threshold, and differential
privacy. A robust rule with ``secure: true`` is refused here: secure aggregation shows a
node only the masked sum, never the single vectors a robust rule compares. So is a graph
that secure aggregation cannot mask (``check_secure_groups``): ``p2pfl check`` and
``p2pfl run`` refuse the same files."""

from __future__ import annotations

from p2pfl.config.fields import FieldReader, shown
from p2pfl.config.schema import AggregationConfig
from p2pfl.core.aggregate import parse_rule
from p2pfl.core.compress import Compression, parse_compression
from p2pfl.core.privacy import DPConfig
from p2pfl.core.topology import TopologyConfig, graph_for_round
from p2pfl.proto.wire import MAX_GROUP_IDS


class AggregationReader(FieldReader):
    """The aggregation section and its dp subsection."""

    def aggregation(self, value: object) -> AggregationConfig:
        section = self.section(
            value,
            "aggregation",
            (
                "rule",
                "secure",
                "clip",
                "frac_bits",
                "recovery_timeout",
                "threshold",
                "dp",
                "compression",
                "consensus_step",
            ),
        )
        raw_rule = section.get("rule", "metropolis")
        if not isinstance(raw_rule, str):
            self.fail("aggregation.rule", f"expected a rule name, got {shown(raw_rule)}")
        try:
            parsed_rule = parse_rule(raw_rule)
        except ValueError as exc:
            self.fail("aggregation.rule", str(exc))
        rule = str(parsed_rule)
        secure = self.boolean(section.get("secure", False), "aggregation.secure")
        if secure and parsed_rule.robust:
            self.fail(
                "aggregation.rule",
                f"{rule} cannot be combined with secure: true: with secure aggregation a "
                "node only ever sees the masked sum of its neighbourhood, never the single "
                "vectors a robust rule compares; use rule metropolis with secure aggregation, "
                "or secure: false with a robust rule",
            )
        d = AggregationConfig(rule, secure)
        clip = self.positive(section.get("clip", d.clip), "aggregation.clip", 2.0**30, "a number")
        frac_bits = self.integer(
            section.get("frac_bits", d.frac_bits), "aggregation.frac_bits", 1, 30
        )
        if clip * 2.0**frac_bits > 2.0**30:
            self.fail(
                "aggregation.clip",
                f"clip * 2**frac_bits must be at most 2**30 (sums are signed 32-bit "
                f"integers, every term rounded on its own); "
                f"{clip:g} * 2**{frac_bits} is {clip * 2.0**frac_bits:.3g}: "
                "lower clip or frac_bits",
            )
        recovery_timeout = self.seconds(
            section.get("recovery_timeout", d.recovery_timeout), "aggregation.recovery_timeout"
        )
        threshold = self.positive(
            section.get("threshold", d.threshold), "aggregation.threshold", 1.0, "a fraction"
        )
        if not 0.5 <= threshold < 1.0:
            self.fail(
                "aggregation.threshold",
                f"expected a fraction >= 0.5 and < 1 (0.5: a strict majority of a group's "
                f"members rebuilds a secret), got {threshold:g}",
            )
        dp = self.dp(section["dp"]) if section.get("dp") is not None else None
        if dp is not None and dp.correlated_multiplier is not None and parsed_rule.robust:
            self.fail(
                "aggregation.dp.correlated_multiplier",
                f"cannot be combined with rule {rule}: correlated noise cancels only in a "
                "weighted average (metropolis); a robust rule keeps or clips the noisy "
                "vectors, so the pairs' noise would stay in every model",
            )
        compression = self.compression(section.get("compression", "none"), secure)
        consensus_step = self.consensus_step(section.get("consensus_step"), compression)
        return AggregationConfig(
            rule,
            secure,
            clip,
            frac_bits,
            recovery_timeout,
            dp=dp,
            threshold=threshold,
            compression=str(compression),
            consensus_step=consensus_step,
        )

    def consensus_step(self, step: object, compression: Compression) -> float | None:
        if step is None:
            return None
        if not compression.enabled:
            self.fail(
                "aggregation.consensus_step",
                "applies only with a compression (it is the step of the averaging of "
                "public copies); remove it, or set aggregation.compression",
            )
        return self.positive(step, "aggregation.consensus_step", 1.0, "a step size")

    def compression(self, value: object, secure: bool) -> Compression:
        if not isinstance(value, str):
            self.fail(
                "aggregation.compression",
                f"expected none, fp16, int8 or topk:FRACTION, got {shown(value)}",
            )
        try:
            compression = parse_compression(value)
        except ValueError as exc:
            self.fail("aggregation.compression", str(exc))
        if secure and compression.enabled:
            self.fail(
                "aggregation.compression",
                f"{compression} cannot be combined with secure: true: a secure vector is "
                "masked with uniformly random 32-bit numbers, which do not compress, and a "
                "ring narrow enough to pay (16 bits) cannot hold a neighbourhood's sum at "
                "a useful precision; use compression: none with secure aggregation",
            )
        return compression

    def dp(self, value: object) -> DPConfig:
        required = ("clip_norm", "noise_multiplier", "delta")
        keys = (*required, "correlated_multiplier", "curious")
        section = self.section(value, "aggregation.dp", keys, required)
        clip_norm = self.positive(section["clip_norm"], "aggregation.dp.clip_norm")
        noise = self.positive(section["noise_multiplier"], "aggregation.dp.noise_multiplier")
        delta = self.positive(section["delta"], "aggregation.dp.delta", 0.5)
        raw = section.get("correlated_multiplier")
        correlated = (
            None if raw is None else self.positive(raw, "aggregation.dp.correlated_multiplier", 1e6)
        )
        if "curious" in section and correlated is None:
            self.fail(
                "aggregation.dp.curious",
                "applies only with correlated_multiplier (the colluding peers the accounting "
                "of correlated noise allows for)",
            )
        curious = self.integer(section.get("curious", 1), "aggregation.dp.curious", 0, 64)
        return DPConfig(clip_norm, noise, delta, correlated, curious)

    def check_correlated_clip(
        self,
        topology: TopologyConfig,
        ids: tuple[str, ...],
        seed: int,
        rounds: int,
        aggregation: AggregationConfig,
    ) -> None:
        """Secure aggregation clips every entry to [-clip, clip]: correlated noise of
        std c * C per pair must stay well inside it (6 standard deviations of a node's
        sum over its pairs), or clipped entries break the pairs' cancellation."""
        dp = aggregation.dp
        if dp is None or dp.correlated_multiplier is None:
            return
        degree = max(
            len(neighbours)
            for r in (range(rounds) if topology.resample_every else range(1))
            for neighbours in graph_for_round(topology, ids, seed, r).values()
        )
        spread = 6.0 * dp.correlated_multiplier * dp.clip_norm * degree**0.5
        if spread > aggregation.clip:
            self.fail(
                "aggregation.dp.correlated_multiplier",
                f"with secure aggregation a node's correlated noise (std "
                f"{dp.correlated_multiplier:g} x clip_norm {dp.clip_norm:g} x sqrt({degree}) "
                f"neighbours) must stay within aggregation.clip ({aggregation.clip:g}) "
                f"by 6 standard deviations ({spread:.3g} here): clipped entries would not "
                "cancel; lower correlated_multiplier or raise aggregation.clip",
            )

    def check_secure_groups(
        self, topology: TopologyConfig, ids: tuple[str, ...], seed: int, rounds: int
    ) -> None:
        """Secure aggregation needs every group to have two members besides its owner (with
        one, its contribution could not be masked) and at most what a message can name:
        every peer needs 2 to MAX_GROUP_IDS neighbours in every round's graph."""
        for r in range(rounds) if topology.resample_every else range(1):
            graph = graph_for_round(topology, ids, seed, r)
            for peer, neighbours in graph.items():
                if len(neighbours) > MAX_GROUP_IDS:
                    self.fail(
                        "aggregation.secure",
                        f"supports at most {MAX_GROUP_IDS} neighbours per peer, but {peer} "
                        f"has {len(neighbours)} in round {r}",
                    )
                if len(neighbours) < 2:
                    self.fail(
                        "aggregation.secure",
                        f"needs every peer to have at least 2 neighbours, but {peer} has "
                        f"{len(neighbours)} in round {r} (use a topology of degree >= 2)",
                    )
