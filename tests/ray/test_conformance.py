"""The plain front door's protocol tests, run against the Ray Serve front door.

Left out (they do not apply to Serve's proxy): grpc.health checking (Serve's proxy has
reflection but no health service), repository load/unload (models are deployments),
`--max-message-bytes` and SIGTERM draining (they start plain servers of their own).
"""

from __future__ import annotations

import pytest

from tests.server.test_protocol import (  # noqa: F401 - fixtures and tests, collected here
    channel,
    images,
    stub,
    test_bad_input_gets_a_clear_error_and_the_next_request_succeeds,
    test_infer_classifies_held_out_digits,
    test_live_ready_and_metadata,
    test_model_metadata_and_config,
    test_model_ready_is_false_for_unknown_model_or_version,
    test_requested_outputs_subset,
    test_statistics_count_inferences,
    test_typed_contents_match_raw,
    test_unknown_model_metadata_and_config_are_not_found,
)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
