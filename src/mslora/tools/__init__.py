"""Commands that use the library, not part of it: ``mslora bench`` (:mod:`~mslora.tools.bench`), ``report``
(:mod:`~mslora.tools.report`), ``visualize`` (:mod:`~mslora.tools.visualize`) and ``sweep``
(:mod:`~mslora.tools.sweep`)."""
