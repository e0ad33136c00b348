"""Tool calling (docs/structured-outputs.md): model-family formats, prompt rendering, output parsing
(whole and streamed) and the grammars that enforce ``tool_choice`` required or named."""
