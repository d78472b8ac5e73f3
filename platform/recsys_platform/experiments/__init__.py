"""Online experiments between the champion and a challenger: shadow, split (A/B), decided from
the impression log. ``definition`` (what an experiment is, who is in which arm), ``stats``
(pure statistics and the decision rule), ``store`` (MLflow), ``analysis`` (labelled impressions
per arm), ``flow`` (the scheduled ``decide``)."""
