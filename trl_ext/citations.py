"""Papers, as the model cards of trl_ext's trainers cite them: each loss family names its own (`trl_ext.losses`)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Citation:
    """A paper: its title, arXiv id (`None` if not on arXiv) and BibTeX entry."""

    title: str
    arxiv_id: str | None
    bibtex: str


def arxiv_citation(key: str, title: str, first_author: str, year: int, arxiv_id: str) -> Citation:
    """The citation of an arXiv paper, its BibTeX entry keyed `key`."""
    bibtex = (f"@misc{{{key},\n    title         = {{{{{title}}}}},\n"
              f"    author        = {{{first_author} and others}},\n    year          = {year},\n"
              f"    eprint        = {{{arxiv_id}}},\n    archivePrefix = {{arXiv}},\n}}")
    return Citation(title, arxiv_id, bibtex)


# The paper of TRL's own DPO loss types
DPO = arxiv_citation("rafailov2023direct",
                     "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
                     "Rafailov, Rafael", 2023, "2305.18290")
