"""Derivatives pacs2bids writes under ``derivatives/`` of the dataset (issue 15).

- :mod:`.deface`: pydeface's method on one image (:func:`~.deface.deface`, :class:`~.deface.DefaceFailed`);
- :mod:`.register`: its template onto the image, FSL ``flirt`` when installed, else SimpleITK;
- :mod:`.checks`: whether a defacing can be trusted;
- :mod:`.deface_study`: a study's images into ``derivatives/pacs2bids-deface/`` (called by
  :func:`pacs2bids.study.extract_study`);
- :mod:`.qc`, :mod:`.qc_indices`, :mod:`.qc_report`: protocol conformity per session into
  ``derivatives/pacs2bids-qc/`` (a dataset-level step of the flow).
"""
