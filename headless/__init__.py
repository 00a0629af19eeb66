"""Running workflows without the UI: UI-format -> API-format conversion, the headless runner, the sample-workflow builder."""
