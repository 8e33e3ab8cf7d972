"""The data column, public files to batches: formats/ (readers), pipeline/ (tokenise, images, collate), demo/ (the embedded demo in the public layouts), datasets/ (what a run reads); errors.py holds DataError. It never imports blocks or models.
May import: vlblocks.batch, vlblocks.contracts.
"""
