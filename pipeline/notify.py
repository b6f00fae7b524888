"""Tell people what a pipeline run did: a promotion, a gate refusal, a failed or crashed run.

The messages go through a Prefect notification block, chosen from the environment, never from
params (a webhook URL is a credential, and params are logged to MLflow and written to dvc.lock):

- `VAE_NOTIFY_BLOCK`: the name of a saved notification block of any type (Slack, Microsoft Teams,
  email, PagerDuty, a custom webhook...), e.g. `slack-webhook/ml-team`, made once in the Prefect UI
  or with `SlackWebhook(url=...).save("ml-team")`; its secret stays in Prefect's block store;
- `VAE_NOTIFY_WEBHOOK`: a URL that gets a JSON POST `{"subject": ..., "body": ...}` through Prefect's
  `CustomWebhookNotificationBlock`.

With neither set, nothing is sent. A notification that cannot be delivered is logged and never
fails the run: the run's own state is what counts. The hooks are the flows' state hooks
(`pipeline/flows.py`), so they fire for `make flow`, `make scheduler`'s scheduled runs and a GPU
worker's training runs alike.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prefect.blocks.core import Block
from prefect.blocks.notifications import CustomWebhookNotificationBlock, NotificationBlock

ENV_BLOCK = "VAE_NOTIFY_BLOCK"
ENV_WEBHOOK = "VAE_NOTIFY_WEBHOOK"
TIMEOUT_S = 10.0

log = logging.getLogger(__name__)


def notifier() -> NotificationBlock | None:
    """The configured notification block, or None when no destination is set."""
    block_name = os.environ.get(ENV_BLOCK, "").strip()
    if block_name:
        block = Block.load(block_name)
        if not isinstance(block, NotificationBlock):
            raise TypeError(f"${ENV_BLOCK}={block_name!r} is a {type(block).__name__}, not a notification block")
        return block
    url = os.environ.get(ENV_WEBHOOK, "").strip()
    if url:
        return CustomWebhookNotificationBlock(
            name="vae-mlops", url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"}, timeout=TIMEOUT_S
        )
    return None


def send(subject: str, body: str) -> bool:
    """Send one message; True if it went out. Failures are logged, not raised."""
    try:
        block = notifier()
        if block is None:
            return False
        block.notify(body=body, subject=subject)
    except Exception as exc:  # noqa: BLE001 - a notification must never turn a run's outcome into another one
        log.warning("notification %r not sent: %s: %s", subject, type(exc).__name__, exc)
        return False
    log.info("notification sent: %s", subject)
    return True


def _run_label(flow: Any, flow_run: Any) -> str:
    scheduled = " (scheduled)" if getattr(flow_run, "deployment_id", None) else ""
    return f"{flow.name} run {flow_run.name}{scheduled}"


def registration_message(summary: dict[str, Any]) -> tuple[str, str] | None:
    """(subject, body) for the registration a pipeline run made, or None when `register` did not run."""
    stage = (summary.get("stages") or {}).get("register") or {}
    reg = summary.get("registration") or {}
    if not stage.get("ran") or not reg:
        return None
    what = "promoted to champion" if reg.get("decision") == "promoted" else "refused by the gate"
    subject = f"{reg.get('model_name')} v{reg.get('version')} {what}"
    lines = [
        subject,
        f"reason: {reg.get('reason')}",
        f"{reg.get('metric')}: {reg.get('value')} "
        f"(champion v{reg.get('champion_version')}: {reg.get('champion_value')})",
        f"MLflow run: {summary.get('mlflow_url') or summary.get('mlflow_run_id')}",
    ]
    return subject, "\n".join(lines)


def on_pipeline_completed(flow: Any, flow_run: Any, state: Any) -> None:
    """Completion hook of `vae-pipeline`: a promotion or a gate refusal, when this run registered a version."""
    try:
        summary = state.result(raise_on_failure=False)
    except Exception as exc:  # noqa: BLE001 - a result that cannot be read is no reason to fail the hook
        log.warning("no notification: the run's result could not be read (%s)", exc)
        return
    message = registration_message(summary) if isinstance(summary, dict) else None
    if message is not None:
        subject, body = message
        send(subject, f"{body}\nflow run: {_run_label(flow, flow_run)}")


def on_run_failed(flow: Any, flow_run: Any, state: Any) -> None:
    """Failure and crash hook: which run, how it ended and why."""
    subject = f"{_run_label(flow, flow_run)} {state.type.value.lower()}"
    send(subject, f"{subject}: {state.message or 'no message'}\nSee the flow run's logs in the Prefect UI.")
