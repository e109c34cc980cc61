"""MODEL → Setup: presets, directories, hub ids, factories and Trainers read, then built as options ask."""
