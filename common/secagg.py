"""SecAgg+ (Bell et al. 2020, as Flower implements it) for our Message-API round loop: what both sides share.

Flower 1.41 runs SecAgg+ only inside its legacy workflow (`SecAggPlusWorkflow` + `secaggplus_mod`), which
our own round loop cannot use; server/secagg.py and client/secagg.py run the same four stages as extra
train messages. This module holds what both sides must agree on: the stage names and config keys
(Flower's own `secaggplus_constants`), the settings, the encoding of an update into the field and back,
the masks, and the site's key pairs. The cryptography is Flower's public primitives
(`flwr.common.secure_aggregation`: Shamir shares, ECDH + HKDF shared keys, Fernet, quantization,
modular arithmetic) and `cryptography`'s; nothing here is a home-made primitive.

Two choices differ from Flower's legacy code, on purpose:
- the masks come from a ChaCha20 keystream keyed by SHA-256 of the whole seed, not from Flower's
  `pseudo_rand_gen`, which folds every seed into 32 bits for numpy's RandomState: a 2**32 seed space
  per mask can be searched, and a masked vector would then hide nothing. The stream is exactly uniform
  on the field (a power of two), which is what the server's spy test checks.
- the weight is an integer folded in after quantization (each site sends w·q(Δ) and w, w = its
  num-examples capped at max-site-weight), in a 2**62 field, instead of Flower's float ratio
  num-examples / max-weight applied before quantization: the mean then keeps the quantizer's full
  resolution, whatever the sites' sizes (its error is below one quantization step, 2c/T).
What is masked is the update (new weights minus the global model), clipped coordinate-wise to
±secagg-clipping-range by the quantizer, after the site clipped its L2 norm to max-update-norm (when set).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_der_private_key,
    load_der_public_key,
)
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, factor_extract, parameters_mod
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

from common.config import RunConfig
from common.errors import ConfigError

MODES = ("off", "secaggplus")
STAGES = Stage.all()  # setup, share_keys, collect_masked_vectors, unmask: the order both sides enforce
SETUP, SHARE_KEYS, COLLECT, UNMASK = STAGES
STAGE = Key.STAGE
ROUND = "server-round"
MOD_BITS = 62  # int64 arithmetic: a sum of two field elements never overflows
MOD_RANGE = 2**MOD_BITS
WEIGHT_NAME = "secagg-weight"  # the first array of a masked vector: the site's weight w
__all__ = ["COLLECT", "SETUP", "SHARE_KEYS", "UNMASK", "Key", "Settings", "decode", "encode", "mask"]


@dataclass(frozen=True)
class Settings:
    """One run's SecAgg+ parameters: shares needed to reconstruct a secret, the clipping range c and
    quantization levels T of the field encoding, the largest weight a site may claim."""

    threshold: int
    clipping_range: float
    quantization_range: int
    max_weight: int

    @classmethod
    def of(cls, cfg: RunConfig) -> Settings:
        return cls(cfg.secagg_threshold, cfg.secagg_clipping_range, cfg.secagg_quantization_range,
                   cfg.max_site_weight)

    def check(self, sites: int) -> None:
        """Refuse a round the field or the threshold cannot carry (`sites` sampled)."""
        if not 2 <= self.threshold <= sites:
            raise ConfigError(f"secagg-threshold = {self.threshold} needs 2 <= threshold <= the sites sampled per "
                              f"round ({sites}): lower it, or sample more sites")
        if sites * self.max_weight * self.quantization_range >= MOD_RANGE:
            raise ConfigError(f"{sites} sites x max-site-weight {self.max_weight} x secagg-quantization-range "
                              f"{self.quantization_range} overflows the 2**{MOD_BITS} field: lower one of them")

    @property
    def step(self) -> float:
        """One quantization level: the bound on each coordinate's error in the unmasked mean."""
        return 2 * self.clipping_range / self.quantization_range


def encode(update: list[np.ndarray], weight: int, settings: Settings) -> list[np.ndarray]:
    """[w] + w·q(update): quantized (Flower's stochastic rounding into [0, T]), then weighted, in int64."""
    quantized = quantize([np.asarray(a, dtype=np.float64) for a in update], settings.clipping_range,
                         settings.quantization_range)
    return factor_combine(weight, [np.asarray(q, dtype=np.int64) * weight for q in quantized])


def decode(summed: list[np.ndarray], settings: Settings) -> tuple[list[np.ndarray], int]:
    """The weighted mean update and the total weight from the unmasked sum of `encode`d vectors."""
    total, arrays = factor_extract(parameters_mod(summed, MOD_RANGE))
    total = int(total)
    if total <= 0:
        raise ValueError("the unmasked total weight is not positive: the masks did not cancel")
    return dequantize([a / total for a in arrays], settings.clipping_range, settings.quantization_range), total


def shapes(arrays: list[np.ndarray]) -> list[tuple[int, ...]]:
    return [a.shape for a in arrays]


def mask(seed: bytes, dims: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Uniform field elements for every shape in `dims`, expanded from `seed` by ChaCha20."""
    counts = [int(np.prod(d, dtype=np.int64)) for d in dims]
    key = hashlib.sha256(seed).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    raw = np.frombuffer(stream.update(bytes(8 * sum(counts))), dtype="<u8") & np.uint64(MOD_RANGE - 1)
    out, offset = [], 0
    for dim, count in zip(dims, counts, strict=True):
        out.append(raw[offset:offset + count].astype(np.int64).reshape(dim))
        offset += count
    return out


def add(a: list[np.ndarray], b: list[np.ndarray], sign: int = 1) -> list[np.ndarray]:
    """(a ± b) mod 2**62, array by array."""
    return parameters_mod([x + sign * y for x, y in zip(a, b, strict=True)], MOD_RANGE)


def key_pair() -> tuple[bytes, bytes]:
    """A fresh ECDH key pair (SECP384R1, as Flower's): (private DER, public DER)."""
    private = ec.generate_private_key(ec.SECP384R1())
    return (private.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption()),
            private.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


def private_key(der: bytes) -> ec.EllipticCurvePrivateKey:
    key = load_der_private_key(der, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("not an elliptic-curve private key")
    return key


def public_key(der: bytes) -> ec.EllipticCurvePublicKey:
    key = load_der_public_key(der)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("not an elliptic-curve public key")
    return key
