"""The gateway's schedule task: reports planned doses that were not given (issue 11).

Every ``[schedule] check_interval_s`` it closes the windows that have passed for
the subjects assigned on this gateway (``ScheduleBook.close_windows``) and
commits every decided ``dose_missed`` notice (missed, or withdrawn by a late
session) to the outbox, which publishes it durably on
``{prefix}/{site}/{gateway}/dose-missed/{device}``. Decisions are in the store,
so a restart neither loses a notice nor sends one twice.
"""

from __future__ import annotations

import logging

from devicegw.config import Config
from devicegw.contract.topics import Topics
from devicegw.contract.vocabulary import TopicKind
from devicegw.mqtt.publisher import MqttPublisher
from devicegw.storage.assignments import AssignmentService
from devicegw.storage.schedule_book import ScheduleBook
from drivers.clock import Clock

__all__ = ["ScheduleWatch"]

log = logging.getLogger(__name__)


class ScheduleWatch:
    def __init__(
        self,
        config: Config,
        book: ScheduleBook,
        assignments: AssignmentService,
        publisher: MqttPublisher,
        topics: Topics,
        clock: Clock,
    ) -> None:
        self._device_of_bed = {d.bed: d.id for d in config.devices}
        self.book = book
        self._assignments = assignments
        self._publisher = publisher
        self._topics = topics
        self._clock = clock
        self.notices = 0

    @property
    def task_name(self) -> str:
        return "schedule"

    def crashed(self, error: str) -> None:
        pass

    async def run(self) -> None:
        while True:
            self.check()
            await self._clock.sleep(self.book.settings.check_interval_s)

    def check(self) -> None:
        assigned = {
            a.subject_id: (bed, self._device_of_bed[bed])
            for bed, a in self._assignments.current().items()
            if a.subject_id is not None and bed in self._device_of_bed
        }
        decided = self.book.close_windows(self._clock.now(), assigned)
        if decided:
            log.warning("%d planned dose(s) missed: window closed without a session", decided)
        for notice in self.book.unpublished():
            self._publisher.commit_unique(
                TopicKind.DOSE_MISSED,
                self._topics.dose_missed(notice.device_id),
                notice,
                device_id=notice.device_id,
                event_id=str(notice.event_id),
            )
            self.book.published(notice.event_id)
            self.notices += 1
