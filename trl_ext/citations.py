"""Papers of the losses, and the model card that cites the ones a trainer actually used.

TRL's trainers write a model card (`create_model_card`, called by `save_model` and at each checkpoint) that cites one
paper per trainer class: DPO for `trl.DPOTrainer`, whatever `loss_type` was trained. trl_ext's trainers cite the
papers of the losses in `loss_type` instead, and tag the model with the loss names.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Citation:
    """A paper: its title, arXiv id (`None` if not on arXiv) and BibTeX entry."""

    title: str
    arxiv_id: str | None
    bibtex: str


def _arxiv(key: str, title: str, first_author: str, year: int, arxiv_id: str) -> Citation:
    bibtex = (f"@misc{{{key},\n    title         = {{{{{title}}}}},\n"
              f"    author        = {{{first_author} and others}},\n    year          = {year},\n"
              f"    eprint        = {{{arxiv_id}}},\n    archivePrefix = {{arXiv}},\n}}")
    return Citation(title, arxiv_id, bibtex)


DPO = _arxiv("rafailov2023direct", "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
             "Rafailov, Rafael", 2023, "2305.18290")
DPOP = _arxiv("pal2024smaug", "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive",
              "Pal, Arka", 2024, "2402.13228")
CDPO = Citation(
    "A note on DPO with noisy preferences & relationship to IPO", None,
    "@misc{mitchell2023cdpo,\n    title  = {{A note on DPO with noisy preferences \\& relationship to IPO}},\n"
    "    author = {Mitchell, Eric},\n    year   = 2023,\n    url    = {https://ericmitchell.ai/cdpo.pdf},\n}",
)
RDPO = _arxiv("park2024disentangling", "Disentangling Length from Quality in Direct Preference Optimization",
              "Park, Ryan", 2024, "2403.19159")
BETA_DPO = _arxiv("wu2024betadpo", "beta-DPO: Direct Preference Optimization with Dynamic beta", "Wu, Junkang", 2024,
                  "2407.08639")
NPO = _arxiv("zhang2024negative",
             "Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning",
             "Zhang, Ruiqi", 2024, "2404.05868")
TDPO = _arxiv("zeng2024token", "Token-level Direct Preference Optimization", "Zeng, Yongcheng", 2024, "2404.11999")
IFT = _arxiv("hua2024intuitive", "Intuitive Fine-Tuning: Towards Simplifying Alignment into a Single Process",
             "Hua, Ermo", 2024, "2405.11870")


def model_card_paper(citations: list[Citation], fallback: dict) -> dict:
    """TRL's `_paper` dictionary for the card: the first paper for the sentence "a method introduced in ...", the
    BibTeX entries of all of them, in order and without repeats; `fallback` (the trainer class's) if none."""
    unique = list(dict.fromkeys(citations))
    if not unique:
        return fallback
    return {"title": unique[0].title, "id": unique[0].arxiv_id,
            "citation": "\n\n".join(citation.bibtex for citation in unique)}


class CitesItsLosses:
    """Mixin for a TRL trainer: its model card cites `loss_papers()` (TRL's class paper if none) and is tagged with
    the names in `loss_type`."""

    def loss_papers(self) -> list[Citation]:
        raise NotImplementedError

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        self._paper = model_card_paper(self.loss_papers(), type(self)._paper)
        loss_types = [self.args.loss_type] if isinstance(self.args.loss_type, str) else self.args.loss_type
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        super().create_model_card(model_name, dataset_name, [*tags, *loss_types])
