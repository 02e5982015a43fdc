"""Analyses beside the main audit: how much each training-free metric moves under poisoning
(``metric_sensitivity``, TMLR Table 2)."""
