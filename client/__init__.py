"""fedseg site side: the site configuration, the SuperNode supervisor (``supernode``), local training and the
Flower ClientApp (``app``, loaded by every site round: keep its imports light)."""
