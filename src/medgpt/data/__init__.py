"""The data layer: read every input format into canonical records, validate, count, template, pack."""
