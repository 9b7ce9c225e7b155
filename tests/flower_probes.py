"""The private Flower 1.41 names our tests hold our code against, in one place.

The code outside `common/flower_compat/` uses Flower's public API only
(tests/test_flower_boundary.py enforces it). Some tests must still check our output against
what Flower itself parses or sends; they import those names from here, so an upgrade that
moves one breaks this module at import, named, instead of a scatter of tests.

Inventory (name: why a test needs it):
- `flwr.cli.supernode.register.try_load_public_key`: `flwr supernode register`'s own key loader:
  the keys `fedhosp` writes must be ones Flower accepts (test_certs, test_control_api).
- `flwr.supercore.primitives.asymmetric.public_key_to_bytes`: the bytes the SuperLink stores for a key.
- `flwr.proto.control_pb2.ListNodesRequest`, `RegisterNodeRequest`: real Control API calls, sent to
  the hospitals' address to show nginx refuses them (test_control_api).
- `flwr.supercore.protobuf.constants.PROTOBUF_MEDIA_TYPE`, `...translation.PROTOBUF_REQUEST_TYPES`:
  every route the SuperLink serves, so none can be missed (test_control_api).
- `flwr.common.config.parse_config_args`, `flwr.superlink.cli.flower_superlink._parse_args_run_superlink`,
  `flwr.supernode.cli.flower_supernode._parse_args_run_supernode`: Flower's own argument parsers,
  run on the commands `fedhosp` prints (test_deploy_commands).
- `flwr.cli.install.install_from_fab`, `flwr.clientapp.utils.get_load_client_app_fn`: the two steps of
  Flower's clientapp process (`run_clientapp`) that install the coordinator's bundle and import its
  ClientApp, run behind the site's guard (test_approved_code).
"""

from flwr.cli.install import install_from_fab
from flwr.cli.supernode.register import try_load_public_key
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.config import parse_config_args
from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE
from flwr.supercore.protobuf.translation import PROTOBUF_REQUEST_TYPES
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink as superlink_parser
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode as supernode_parser

__all__ = [
    "PROTOBUF_MEDIA_TYPE", "PROTOBUF_REQUEST_TYPES", "ListNodesRequest", "RegisterNodeRequest",
    "get_load_client_app_fn", "install_from_fab", "parse_config_args", "public_key_to_bytes", "superlink_parser",
    "supernode_parser", "try_load_public_key",
]
