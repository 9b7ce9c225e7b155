"""Float16 transport of updates: half the bytes, the server gets the weights back to float16 precision."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common import transport
from common.config import RunConfig
from common.errors import ConfigError


def _record(**arrays):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def test_float32_sends_the_weights_themselves():
    new, base = _record(w=np.ones(3, np.float32)), _record(w=np.zeros(3, np.float32))
    assert transport.encode(new, base, "float32") is new


def test_float16_halves_the_bytes_and_decodes_to_the_weights():
    rng = np.random.default_rng(0)
    base_w = rng.normal(0, 0.3, (64, 32)).astype(np.float32)
    new_w = base_w + rng.normal(0, 1e-2, base_w.shape).astype(np.float32)
    base, new = _record(w=base_w), _record(w=new_w)
    sent = transport.encode(new, base, "float16")
    assert sent["w"].numpy().dtype == np.float16
    assert len(sent["w"].data) <= len(new["w"].data) / 2 + 256  # half the payload, the .npy header aside
    back = transport.decode(sent, base)["w"].numpy()
    assert back.dtype == np.float32
    update = new_w - base_w
    assert np.abs(back - new_w).max() <= 2**-11 * np.abs(update).max() + 1e-7  # float16 rounding of the update


def test_small_changes_to_weights_near_one_survive():
    """Why updates and not weights: 1 + 1e-4 is 1.0 in float16, but 1e-4 is representable."""
    base, new = _record(g=np.ones(8, np.float32)), _record(g=np.full(8, 1 + 1e-4, np.float32))
    back = transport.decode(transport.encode(new, base, "float16"), base)["g"].numpy()
    assert np.allclose(back - 1, 1e-4, rtol=1e-3)
    assert np.all(np.float16(1 + 1e-4) == 1)


def test_integer_arrays_travel_unchanged():
    base, new = _record(n=np.array([3], np.int64)), _record(n=np.array([5], np.int64))
    sent = transport.encode(new, base, "float16")
    assert sent["n"].numpy().dtype == np.int64 and transport.decode(sent, base)["n"].numpy()[0] == 5


def test_the_setting_names_what_it_accepts():
    assert RunConfig.from_mapping({"update-dtype": "float16"}).update_dtype == "float16"
    with pytest.raises(ConfigError, match=r"update-dtype.*float32 \| float16"):
        RunConfig.from_mapping({"update-dtype": "bfloat16"})
