"""Slicer-side helpers shared by the TCURSegment and TCURFinetune modules.

* :mod:`TCURLoRALib.engine` - find the ``tcurlora`` engine package and ``PythonSlicer``; the default worker
  launcher.
* :mod:`TCURLoRALib.dependencies` - install torch and the other Python packages at first use (after asking).
* :mod:`TCURLoRALib.nodeio` - MRML node <-> file / numpy array (volumes, segmentations).
* :mod:`TCURLoRALib.plots` - the live training-curve table, plot series and chart nodes.
* :mod:`TCURLoRALib.models` - base-model choices, adapter summaries and segment-to-label mappings.
* :mod:`TCURLoRALib.slicerapp` - what needs the Slicer application: the timer-driven runner, settings, dialogs.
* :mod:`TCURLoRALib.tasks` - segmentation and fine-tuning runs: export inputs, drive the worker process,
  import the results (files on a background thread), one run at a time (:class:`tasks.TaskRunner`).
* :mod:`TCURLoRALib.logic` - what the module logics do, without Qt: models, model cards, input checks,
  segmentation runs, the case-library loop.
* :mod:`TCURLoRALib.finetune` - TCUR Finetune's logic, without Qt: the case and label tables, training runs,
  resume, saving the adapter.
* :mod:`TCURLoRALib.caselibrary` - the persistent library of training cases on disk.
* :mod:`TCURLoRALib.selftests` - the scenarios of the module self-tests (also run headless by pytest).

Only :mod:`nodeio`, :mod:`plots`, :mod:`tasks`, :mod:`logic`, :mod:`finetune`, :mod:`caselibrary` and
:mod:`selftests` need MRML (``slicer``/``vtk``); they work inside the Slicer application and on the
``slicer-core`` wheel alike. Only :mod:`slicerapp` imports ``qt`` (timers, settings, dialogs, the widgets'
shared wiring): it needs the Slicer application. The module scripts ``TCURSegment.py`` and ``TCURFinetune.py``
hold the module metadata, the parameter nodes, the widgets' wiring and the self-test entry points.
"""
