"""Alerting: episodes detected in event time, one alert model, and the sinks alerts go to.

Modules: ``settings`` (AlertSettings), ``model`` (Alert), ``episodes`` (+ ``episodes.lua``,
the shared event-time window and episode engine), ``outbox`` (+ ``outbox.lua``, pending
deliveries), ``dispatch`` (background delivery), ``sinks`` (log, Redis stream),
``webhook`` (signed POSTs), ``render`` (shared alert fields), ``handler`` (the base of the
``rejections``, ``data_limit`` and ``attach_loops`` handlers).
"""
