"""The NAS algorithms, one module each: ``darts`` (first and second order, anti-search),
``pdarts``, ``tenas`` (with the NTK condition number and linear regions of ``ntk`` and
``ntk_replicas``), ``robot`` (with the training-free metrics of ``zero_cost``), ``nsganetv2``
(with ``one_shot`` and ``accuracy_predictors``)."""
