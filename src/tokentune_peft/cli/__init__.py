"""The command line: ``tokentune-train`` runs a recipe from ``configs/`` (:mod:`.train`), reading its
fields (:mod:`.recipes`), offline models and data sets (:mod:`.offline`) and named model configs
(:mod:`.model_configs`), and draws its plots (:mod:`.plots`)."""
