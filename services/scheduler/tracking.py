"""What the engine loop knows of each request beyond its sequences: who owns it,
when it arrived, was first scheduled and got its first token, what its steps
cost, and its deadline; from that, the usage and timings its last delta carries,
and the calibration of SLO admission's wait predictions."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from llmesh.services.common.step_plan import StepPlan, StepResult
from llmesh.services.scheduler.scheduler import Scheduler, SeqOutput
from llmesh.services.scheduler.slo import WaitCalibration


@dataclass
class RequestTrack:
    owner: str
    arrival_s: float
    deadline_s: float  # time.time() based; 0 = none
    first_scheduled_s: float = 0.0
    first_token_s: float = 0.0
    predicted_ttft_s: float | None = None  # SLO admission's estimate, when it made one
    forward_s: float = 0.0
    sample_s: float = 0.0
    num_steps: int = 0
    finish_reasons: list = field(default_factory=list)


@dataclass
class FinishedInfo:
    """Usage and timings attached to a sequence's last delta."""

    queue_s: float
    ttft_s: float
    e2e_s: float
    forward_s: float
    sample_s: float
    num_steps: int


class RequestTracks:
    """The live requests of one loop, by request id."""

    def __init__(self, scheduler: Scheduler, calibration: WaitCalibration):
        self.scheduler = scheduler
        self.calibration = calibration  # learns from each first token's real wait
        self._tracks: dict[str, RequestTrack] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._tracks

    def __len__(self) -> int:
        return len(self._tracks)

    def __bool__(self) -> bool:
        return bool(self._tracks)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._tracks))

    def add(self, request_id: str, track: RequestTrack) -> None:
        self._tracks[request_id] = track

    def get(self, request_id: str) -> RequestTrack | None:
        return self._tracks.get(request_id)

    def pop(self, request_id: str) -> RequestTrack:
        return self._tracks.pop(request_id)

    def of_owner(self, owner: str) -> list[str]:
        return [r for r, t in self._tracks.items() if t.owner == owner]

    def past_deadline(self, now: float) -> list[tuple[str, RequestTrack]]:
        return [(r, t) for r, t in self._tracks.items() if t.deadline_s and now >= t.deadline_s]

    def _of_seqs(self, seq_ids: Iterable[str]) -> Iterator[RequestTrack]:
        seqs, tracks = self.scheduler.seqs, self._tracks
        for seq_id in seq_ids:
            seq = seqs.get(seq_id)
            track = tracks.get(seq.request_id) if seq is not None else None
            if track is not None:
                yield track

    def on_planned(self, plan: StepPlan, now: float) -> None:
        # (a sequence is first scheduled as a new one in its plan: admitted, or resumed
        # after a preemption; forks are made by a step of their scheduled parent)
        for track in self._of_seqs(new.seq_id for new in plan.new):
            if not track.first_scheduled_s:
                track.first_scheduled_s = now

    def on_result(self, plan: StepPlan, result: StepResult) -> None:
        for track in self._of_seqs(s.seq_id for s in plan.scheduled):
            track.forward_s += result.forward_s
            track.sample_s += result.sample_s
            track.num_steps += 1

    def on_output(self, track: RequestTrack, out: SeqOutput, now: float) -> FinishedInfo | None:
        """Record an output of `track`'s request; the info its last delta carries."""
        if out.new_token_ids and not track.first_token_s:
            track.first_token_s = now
            if track.predicted_ttft_s is not None:
                self.calibration.record(track.predicted_ttft_s, now - track.arrival_s)
        if out.finish_reason is None:
            return None
        track.finish_reasons.append(out.finish_reason.value)
        return FinishedInfo(
            queue_s=(track.first_scheduled_s or now) - track.arrival_s,
            ttft_s=(track.first_token_s or now) - track.arrival_s,
            e2e_s=now - track.arrival_s, forward_s=track.forward_s,
            sample_s=track.sample_s, num_steps=track.num_steps)
