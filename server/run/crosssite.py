"""Cross-site validation, server side: every N rounds and after the last, each site scores the global model.

The sites run :func:`fedseg.client.crosssite.score_cases` on their own labelled cases (their annotated organs
only) and reply with aggregates. The server turns the replies into the site × organ matrix
``{site: {organ: {"dice": {"mean", "sd", "n"}, "hd95": {...}}}}`` that the history keeps per round.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedseg.common.fl.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    FAILURE_KEY,
    METRICS_KEY,
    ROUND_KEY,
    SITE_KEY,
    read_scores,
)

log = logging.getLogger(__name__)

#: site -> organ -> metric -> {"mean", "sd", "n"}
Matrix = dict[str, dict[str, dict[str, dict[str, float]]]]


class CrossSite:
    """When to ask the sites for cross-site scores, the messages, and the matrix from their replies.

    Args:
        every: rounds between cross-site validations (0 = only after the last round; None = never).
        last_round: the run's last Flower round.
    """

    def __init__(self, every: int | None, last_round: int) -> None:
        self.every = every
        self.last_round = last_round

    def due(self, server_round: int) -> bool:
        """Whether round ``server_round`` ends with a cross-site validation."""
        if self.every is None:
            return False
        return server_round == self.last_round or (self.every > 0 and server_round % self.every == 0)

    def messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        """Evaluate messages (global weights + the train task) to every connected site when due, else none."""
        if not self.due(server_round):
            return []
        config[ROUND_KEY] = server_round
        content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        nodes = list(grid.get_node_ids())
        log.info("round %d: cross-site validation at %d sites", server_round, len(nodes))
        return [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes]


def matrix_of(replies: Iterable[Message]) -> Matrix:
    """The site × organ matrix of the usable evaluate replies (errors and malformed replies are logged, skipped)."""
    matrix: Matrix = {}
    for reply in replies:
        site = _site_name(reply)
        if reply.has_error() or METRICS_KEY not in reply.content.metric_records:
            reason = reply.error.reason if reply.has_error() else _failure(reply)
            log.warning("cross-site validation: no scores from %s (%s)", site, reason)
            continue
        metrics = dict(reply.content.metric_records[METRICS_KEY])
        matrix[site] = read_scores({k: v for k, v in metrics.items() if isinstance(v, int | float)})
    return matrix


def _failure(reply: Message) -> str:
    """Why a reply without scores has none: the site's stated failure (a policy refusal, a time limit), if any."""
    record = reply.content.config_records.get(SITE_KEY)
    failure = record.get(FAILURE_KEY) if record is not None else None
    return f"site failure: {failure}" if isinstance(failure, str) else "no metrics"


def _site_name(reply: Message) -> str:
    record = reply.content.config_records.get(SITE_KEY) if reply.has_content() else None
    name = record.get("name") if record is not None else None
    return str(name) if name else f"node-{reply.metadata.src_node_id}"
