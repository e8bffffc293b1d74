"""Unlabeled data for semi-supervised methods, the nnU-Net way.

* :mod:`.preprocess`: ``imagesUn/`` (unlabeled images in a raw dataset) preprocessed with the dataset's own
  plans by nnU-Net's preprocessor into ``<data_identifier>_unlabeled/`` (``nnunet-plugins semi preprocess``);
* :mod:`.split`: the labeled-fraction protocol, ``splits_semi.json`` next to ``splits_final.json``
  (``nnunet-plugins semi split``), and the record a trainer writes into its fold folder;
* :mod:`.dataloading`: L labeled + U unlabeled batches through nnU-Net's sampling and augmentation
  (:func:`.dataloading.get_semi_dataloaders`, what a semi-supervised trainer calls).
"""
